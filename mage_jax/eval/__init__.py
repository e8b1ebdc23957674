"""Sample-quality metrics (FID, Inception Score) computed the way torch-fidelity does."""
