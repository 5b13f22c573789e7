"""Code generation: sympy printers and Jinja2 templates that turn the IR into a Python module."""
