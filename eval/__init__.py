"""Evaluation of backbones: features, kNN, linear probe, fine-tuning, pictures, MLflow; `python -m eval.run`.

    eval.features   extract_features(backbone, images | batches, labels, preprocess, distributed=...), cached_features(...)
    eval.knn        knn_classify(...), knn_accuracy(...)  -> {"top1@20": ..., "top5@20": ...}
    eval.linear     linear_probe(...)                     -> {"top1", "top5", "lr"}
    eval.finetune   finetune(target, ...)                 -> {"top1", "top5", ...}; `python -m eval.finetune`
    eval.attention  record_attention(backbone, x)         -> (B, layers, heads, N, N)
    eval.pictures   attention maps, reconstructions, embeddings, curves as PNG files
    eval.visualize  `python -m eval.visualize CHECKPOINT [IMAGES...]`
    eval.compare    `python -m eval.compare`: a table of runs and their scores
    eval.tracking   tracking_uri, get_experiment_id, start_run, log_metrics, ... (shared with the trainer)
    eval.run        score_checkpoint, subset_scorer, and the CLI

Layering: imports `backbones` and `data`, never `pretrain`; `objectives` only in eval.visualize, lazily,
for MAE/SimMIM reconstructions (they need the objective's decoder). Scoring needs a backbone and its
saved config alone. Nothing is imported here, so `import eval.knn` stays light.
"""
