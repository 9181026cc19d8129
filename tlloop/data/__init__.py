"""Data: readers of labelled examples (`readers/`), their splits (`splits`), where they live
(`storage`: in memory or streamed) and the tf.data pipelines that feed the steps (`examples`).
Everything here takes explicit arguments; `tlloop.cli.data` turns a DataConfig into them."""
