"""The ground floor: what every other part stands on and which imports nothing of the project above it.

errors (UserError, the one-line error), distributed (torchrun ranks and their collectives), checkpoint
(atomic, code-free checkpoint files) and metrics (accuracies and calibration of a test set)."""
