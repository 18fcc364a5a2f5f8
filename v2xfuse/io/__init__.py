"""Readers and writers for the file formats the datasets use."""
