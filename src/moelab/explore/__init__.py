"""`moelab explore`: a local web app over routing traces (server, SQL queries over Parquet, static page)."""
