"""Quality metrics for VAE-family models and their synthetic data: sample fidelity and diversity
(fidelity), usefulness for training a classifier (classifier), disentanglement (disentanglement)
and anomaly detection (anomaly). Plain functions over arrays and tensors: no files, Ray or MLflow.
"""
from pipelines.metrics.anomaly import (anomaly_scores, detection_metrics, held_out_class_detection,
                                       train_briefly)
from pipelines.metrics.classifier import (ReferenceClassifier, accuracy, augmentation_gain, features, predict,
                                          stratified_subset, train_classifier, train_test_accuracy)
from pipelines.metrics.disentanglement import factor_gaps, mutual_information_gap
from pipelines.metrics.fidelity import frechet_distance, precision_recall_density_coverage

__all__ = ["anomaly_scores", "detection_metrics", "held_out_class_detection", "train_briefly",
           "ReferenceClassifier", "accuracy", "augmentation_gain", "features", "predict", "stratified_subset",
           "train_classifier", "train_test_accuracy", "factor_gaps", "mutual_information_gap",
           "frechet_distance", "precision_recall_density_coverage"]
