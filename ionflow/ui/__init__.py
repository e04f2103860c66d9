"""The campaign dashboard (``ionflow ui``): read-only web pages over a campaign's database, beside
the Prefect UI. :func:`ionflow.ui.app.create_app` builds the app."""
