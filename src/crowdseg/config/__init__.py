from crowdseg.config.load import load_config, to_yaml
from crowdseg.config.schema import ExperimentConfig

__all__ = ["ExperimentConfig", "load_config", "to_yaml"]
