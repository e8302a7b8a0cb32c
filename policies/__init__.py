"""Networks and RLlib pieces: the triplet embedding network, DARP's modules, learners and algorithms."""

import logging


class _RLModuleConfigNotice(logging.Filter):
    """Drops RLlib's "`RLModule(config=[RLModuleConfig object])` has been deprecated" message.

    Ray 2.60's RLModule.__init__ builds the deprecated RLModuleConfig itself (rl_module.py, "TODO
    (sven): Deprecate this"), whatever constructor is used: our modules use the current one
    (observation_space=, action_space=, model_config=), so the message points at nothing to fix here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "RLModule(config=[RLModuleConfig object])" not in record.getMessage()


logging.getLogger("ray._common.deprecation").addFilter(_RLModuleConfigNotice())
