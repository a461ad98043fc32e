"""The DvD vision service: InternVL3.5 ViT + ViR router + MLP projector behind gRPC (`python -m vision_server`)."""
