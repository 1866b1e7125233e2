"""export: the MLX twin of Llamba, the PyTorch -> MLX converter, MLX generation and the chat loop.

Nothing here imports mlx at package import time; see export/README.md."""
