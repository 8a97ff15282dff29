"""Training inputs and loop: data sets, batch sampling and the fine-tuning step."""
