"""Everything printed: the one vocabulary for plans (``describe``), text for a plan or
a configuration (``plan_text``), row tables and CSV/JSON (``rows``) and charts (``plots``)."""
