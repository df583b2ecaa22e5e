"""Phase 4, publish: statistics and plots, the dataset card, trainer exports and the Hub."""
