"""Quality metrics for VAE-family models and their synthetic data: sample fidelity and diversity
(fidelity), usefulness for training a classifier (classifier), whether that classifier can judge
(reliability), copying of training data (memorisation), disentanglement (disentanglement) and
anomaly detection (anomaly). Plain functions over arrays and tensors: no Ray or MLflow.
"""
from pipelines.evaluation.metrics.anomaly import (anomaly_scores, detection_metrics, held_out_class_detection,
                                       train_briefly)
from pipelines.evaluation.metrics.classifier import (FitReport, ReferenceClassifier, accuracy, augmentation_gain, features,
                                          fit_classifier, load_classifier, per_class_accuracy, predict,
                                          predict_proba, save_classifier, stratified_subset, train_classifier,
                                          train_test_accuracy)
from pipelines.evaluation.metrics.disentanglement import factor_gaps, mutual_information_gap
from pipelines.evaluation.metrics.fidelity import frechet_distance, precision_recall_density_coverage
from pipelines.evaluation.metrics.memorisation import memorisation, nearest_distances
from pipelines.evaluation.metrics.reliability import Reliability, chance_accuracy, judge

__all__ = ["anomaly_scores", "detection_metrics", "held_out_class_detection", "train_briefly",
           "FitReport", "ReferenceClassifier", "accuracy", "augmentation_gain", "features", "fit_classifier",
           "load_classifier", "per_class_accuracy", "predict", "predict_proba", "save_classifier",
           "stratified_subset", "train_classifier", "train_test_accuracy", "factor_gaps", "mutual_information_gap",
           "frechet_distance", "precision_recall_density_coverage", "memorisation", "nearest_distances",
           "Reliability", "chance_accuracy", "judge"]
