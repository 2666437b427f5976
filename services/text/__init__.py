"""Text worker: sentence-embedding and CLIP text-tower backends behind the Encoder contract."""
