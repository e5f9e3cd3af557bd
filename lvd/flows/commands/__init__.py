"""One module per `lvd` sub-command (see lvd/flows/cli.py)."""

# The `--model` help of every command that takes a backbone (lvd.pretrain.models.load_backbone).
MODEL_HELP = ("an lvd checkpoint dir or run --out folder, an official DINOv2 .pth, "
              "or a Hugging Face Dinov2 folder")
