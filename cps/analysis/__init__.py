"""Pure analyses on tensors and frames (error, SNR, IoU, LAPE, LSAR) and their plots."""
