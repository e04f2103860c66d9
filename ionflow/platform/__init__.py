"""The science of ionflow: model, training, MD, selection, structures. No Prefect, no database."""
