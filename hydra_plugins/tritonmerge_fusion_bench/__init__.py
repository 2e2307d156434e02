"""Hydra search-path plugin: puts tritonmerge's FusionBench configs on Hydra's search path, so
``fusion_bench method=tritonmerge/wudi ...`` finds ``method/tritonmerge/wudi.yaml`` once
tritonmerge is installed. Hydra imports every module of the ``hydra_plugins`` namespace
package when it starts; this one imports nothing of tritonmerge (no torch), it only names the
configs' package. See docs/fusion_bench.md."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

# kept equal to tritonmerge.integrations.fusion_bench.CONFIG_PACKAGE (a test checks)
CONFIG_PACKAGE = "tritonmerge.integrations.fusion_bench_config"


class TritonMergeSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # appended: FusionBench's own configs and the user's keep precedence; only the
        # tritonmerge/ option names are added
        search_path.append(provider="tritonmerge", path=f"pkg://{CONFIG_PACKAGE}")
