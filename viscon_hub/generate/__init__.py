"""Model stages: prompt templates, requests built from image contexts, and reply parsers."""
