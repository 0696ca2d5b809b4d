"""Evaluation of frozen backbones: features, kNN, linear probe, MLflow tracking, `python -m eval.run`.

    eval.features  extract_features(backbone, images | batches, labels, preprocess), cached_features(...)
    eval.knn       knn_classify(...), knn_accuracy(...)  -> {"top1@20": ..., "top5@20": ...}
    eval.linear    linear_probe(...)                     -> {"top1", "top5", "lr"}
    eval.tracking  tracking_uri, get_experiment_id, start_run, log_metrics, ... (shared with the trainer)
    eval.run       score_backbone, score_checkpoint, and the CLI

Layering: imports `backbones` and `data`, never `objectives` or `pretrain`: a checkpoint's
backbone.json is all scoring needs. Nothing is imported here, so `import eval.knn` stays light.
"""
