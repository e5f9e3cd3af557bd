"""What users do with a trained DINOv2 backbone: embed images, index and search them, and
look at patch features. Each module is importable on its own; nothing is imported here."""
