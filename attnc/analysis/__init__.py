"""Analyses over the IR: row statistics and passes, tile plans, symbolic derivatives."""
