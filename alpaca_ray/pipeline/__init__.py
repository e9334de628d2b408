"""The whole recipe as Ray jobs: generate -> train -> serve (-> evaluate) from one config file."""

from alpaca_ray.pipeline.config import PipelineConfig, load_pipeline_config, stage_specs

__all__ = ["PipelineConfig", "load_pipeline_config", "stage_specs"]
