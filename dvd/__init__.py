"""Shared pieces of the DvD services: the InternVL checkpoint format, the wire tensor codec, logging."""
