-- Separate databases for the Prefect server and the MLflow tracking server (same Postgres instance).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
