"""Released Direct3D-S2 weights as a first-class input: read a release folder into d3ds2 models (config,
key maps, strict loading), export them back, and resolve ``official:DIR`` initialisations for training."""
from .config import MODEL_SECTIONS, ReleaseConfig, ReleaseConfigError, build_model, read_release_config, release_config
from .export import export_loaded_release, export_release, official_state_dict
from .loading import RELEASE_FILES, OfficialCheckpointError, OfficialRelease, load_release, load_section

__all__ = ["MODEL_SECTIONS", "RELEASE_FILES", "OfficialCheckpointError", "OfficialRelease", "ReleaseConfig",
           "ReleaseConfigError", "build_model", "export_loaded_release", "export_release", "load_release", "load_section",
           "official_state_dict", "read_release_config", "release_config"]
