"""BitFit training (torch + transformers): bias selection, the task head, the trainer."""
