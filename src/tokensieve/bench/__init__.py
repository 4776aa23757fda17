"""tokensieve.bench"""
