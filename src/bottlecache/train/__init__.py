"""What trains on a cache: heads (scikit-learn, Keras), augmented views, end-to-end fine-tuning
and the sweep. Stands on ``cache`` and below."""
