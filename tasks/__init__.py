"""One module per pipeline stage: the stage function (inputs → artifact) and its Prefect task wrapper."""
