"""tokensieve.train — the lab's training runs: the embedded VLM (``tokensieve train vlm``) and its evaluation."""
