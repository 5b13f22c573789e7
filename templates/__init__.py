"""Package data: the Jinja2 templates of generated modules."""
