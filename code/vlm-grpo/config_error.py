"""The error of a setting this recipe refuses. Its own module because grpo_vlm.py's argument checks and the resume
policy (resume.py, which grpo_vlm.py imports) both raise it; grpo_vlm.py prints it as one `error: ...` line."""


class ConfigError(ValueError):
    """A setting this recipe refuses, with the reason and the fix."""
