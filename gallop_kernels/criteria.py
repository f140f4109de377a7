"""The selection criteria by name. Torch-free, so the ``gallop`` command can list them without importing torch."""

CRITERIA = ("gallop", "saft", "pafi", "magnitude", "random")
GRADIENT_CRITERIA = ("gallop", "saft")  # the others need no gradient
