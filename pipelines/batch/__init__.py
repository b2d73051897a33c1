"""The batch stage: one Ray Data skeleton (`job`: blocks, seeds, actor pool, atomic writes,
manifest), its dataset-job helpers (`dataset`), and the jobs on it: generate (with the classifier
`sample_filter`), embed, score, denoise, interpolate."""
