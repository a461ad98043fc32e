"""The language half of DvD: vLLM serving only the language model, fed with image embeddings from the vision pool."""
