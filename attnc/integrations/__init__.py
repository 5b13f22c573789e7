"""Integrations of attnc specs with other libraries: `attnc.integrations.transformers` (Hugging Face)."""
