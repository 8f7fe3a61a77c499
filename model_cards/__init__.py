"""Model card templates for distilled students (Jinja, rendered by hf_kd.hub); installed as hf_kd.model_cards."""
