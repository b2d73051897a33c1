"""The evaluation stage: metrics (`metrics/`: likelihood, fidelity, classifiers, anomaly,
disentanglement, memorisation, reliability) and `evaluate`, which runs them on a model and its
synthetic data and writes the report."""
