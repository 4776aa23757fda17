"""tokensieve.attention"""
