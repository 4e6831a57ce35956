"""What each task adds to the shared pipeline: its data, loss, evaluation and demo."""
