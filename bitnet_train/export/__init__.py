"""Export trained models to the formats inference engines load, and import them back."""
