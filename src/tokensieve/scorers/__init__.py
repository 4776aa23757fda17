"""tokensieve.scorers"""
