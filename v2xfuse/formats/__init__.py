"""Dataset file-format conventions shared by the synthetic writers and the dataset adapters."""
