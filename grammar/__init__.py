"""Package data: the Lark grammar of the .attn language (attn.lark)."""
