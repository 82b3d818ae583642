"""The small core everything goes through: update types, exact spectra, tensor files, base weights, checkpoints,
layer naming and errors. Nothing here imports from formats, analysis, figures or report."""
