"""Profiles (``profile=faithful|quick|smoke``) applied in one place.

``apply_profile(cfg) -> cfg`` is called once per job, before validation; a method reads
sizes and step counts that already have the profile's values. With s = profile.step_scale
and m = profile.min_steps it:

- merges ``<group>.at_profile[profile.name]`` over the backbone, the eps-net and the method (smaller
  presets for the short profiles) and removes ``at_profile``;
- caps an image's side (``data.size``, data=image) at ``profile.max_size``, moved to the
  nearest side the backbone accepts;
- scales DIP epoch plans: constant / list ``epoch_plan.steps`` -> max(m, round(steps * s));
  softmax_beta ``epoch_plan.total`` -> max(1, round(total * s)), each stage then at least
  ``epoch_plan.min_steps`` = max(its own, m) (a total of 0 or 1 splits alike: all to the floor).

Values that are not valid are left as written, so validation names them unchanged.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from dipddpm.errors import require

MERGED_GROUPS = ("backbone", "eps_net", "method")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scaled_steps(steps: int, step_scale: float, min_steps: int) -> int:
    """A step count under a profile: max(min_steps, round(steps * step_scale))."""
    return max(int(min_steps), int(round(steps * step_scale)))


def preset_merged(group: dict, key: str, profile_name: str | None) -> dict:
    """``group`` with ``group['at_profile'][profile_name]`` merged over it (nested keys merge) and
    ``at_profile`` removed. A preset key the group does not have is a ConfigError naming
    ``<key>.at_profile.<profile_name>``."""
    group = dict(group)
    presets = group.pop("at_profile", None) or {}
    require(isinstance(presets, dict), f"{key}.at_profile", presets, f"a mapping from profile name to {key} keys")
    preset = presets.get(profile_name) or {}
    require(isinstance(preset, dict), f"{key}.at_profile.{profile_name}", preset, f"a mapping of {key} keys")

    def merge(base: dict, update: dict, where: str) -> dict:
        unknown = sorted(set(update) - set(base))
        require(not unknown, where, unknown, f"keys of the {key} config: " + ", ".join(map(str, base)))
        out = dict(base)
        for name, value in update.items():
            nested = isinstance(value, dict) and isinstance(base[name], dict)
            out[name] = merge(base[name], value, where) if nested else value
        return out

    return merge(group, preset, f"{key}.at_profile.{profile_name}")


def _capped_size(cfg) -> int | None:
    """The image side under profile.max_size, raised to what the backbone accepts; None: no cap applies."""
    from dipddpm.models import size_requirement

    size, max_size = cfg["data"].get("size"), cfg["profile"].get("max_size")
    if max_size is None or cfg.get("backbone") is None:
        return None
    require(_is_int(max_size) and max_size >= 1, "profile.max_size", max_size, "null or an integer >= 1")
    if not (size is None or (_is_int(size) and size > max_size)):
        return None
    multiple, minimum = size_requirement(OmegaConf.create(cfg["backbone"]))
    capped = max(minimum, (max_size // multiple) * multiple)
    if size is None:
        return capped
    return min(size, capped) if min(size, capped) >= minimum else minimum


def _scale_epoch_plan(plan: dict, step_scale: float, min_steps: int) -> None:
    name = plan.get("name")
    steps = plan.get("steps")
    if name == "constant" and _is_int(steps) and steps >= 1:
        plan["steps"] = scaled_steps(steps, step_scale, min_steps)
    elif name == "list" and isinstance(steps, list) and all(_is_int(n) and n >= 1 for n in steps):
        plan["steps"] = [scaled_steps(n, step_scale, min_steps) for n in steps]
    elif name == "softmax_beta":
        total = plan.get("total")
        if _is_int(total) and total >= 1:
            plan["total"] = max(int(round(total * step_scale)), 1)
        floor = plan.get("min_steps", 1)
        if _is_int(floor):
            plan["min_steps"] = max(floor, min_steps)


def apply_profile(cfg: DictConfig) -> DictConfig:
    """A resolved copy of the composed config with the profile applied (see the module docstring);
    ``profile.applied`` is true in it, and a config already applied is returned as it is.
    Raises ConfigError for unusable profile values or presets."""
    if cfg.profile.get("applied"):
        return cfg
    plain = OmegaConf.to_container(cfg, resolve=True)
    profile = plain["profile"]
    step_scale, min_steps = profile.get("step_scale", 1.0), profile.get("min_steps", 1)
    require(_is_number(step_scale) and step_scale > 0, "profile.step_scale", step_scale, "a number > 0")
    require(_is_int(min_steps) and min_steps >= 1, "profile.min_steps", min_steps, "an integer >= 1")
    for key in MERGED_GROUPS:
        if isinstance(plain.get(key), dict):
            plain[key] = preset_merged(plain[key], key, profile.get("name"))
    if isinstance(plain.get("data"), dict) and plain["data"].get("name") == "image":
        capped = _capped_size(plain)
        if capped is not None:
            plain["data"]["size"] = capped
    if isinstance(plain.get("epoch_plan"), dict):
        _scale_epoch_plan(plain["epoch_plan"], float(step_scale), int(min_steps))
    profile["applied"] = True
    out = OmegaConf.create(plain)
    OmegaConf.set_struct(out, True)
    return out
