"""Against the running gateway (`make run` first): a hybrid query ("more like what user-0 likes, but red
shoes") and one search across every space of images.

Six products are indexed by their descriptions (MiniLM's space) under the ids a small user-item model
"shop" is trained on, from 200 users of whom the even ones like blue products and the odd ones red ones.
"""

from PIL import Image
from skimage import data

from embeddings_client import Client, Item

with Client("localhost:50051") as client:
    products = {"red-sneakers": "a pair of red running shoes", "blue-sneakers": "a pair of blue running shoes",
                "red-hat": "a red wool hat", "blue-hat": "a blue wool hat",
                "red-scarf": "a red silk scarf", "blue-scarf": "a blue silk scarf"}  # fmt: skip
    likes = [(f"user-{u}", item, 5.0 if item.startswith("blue") == (u % 2 == 0) else 1.0)
             for u in range(2000) for item in products]  # fmt: skip
    print("trained", list(client.fit(likes, model="shop"))[-1].model.version)
    client.upsert([Item(key, text=text, payload={"shop": "demo"}) for key, text in products.items()])
    for weight in (0.0, 0.5, 1.0):
        found = client.hybrid_search(
            "red shoes",
            "user-0",
            k=3,
            weight=weight,
            mix="weighted",
            useritem_model="shop",
            where={"shop": "demo"},
        )
        print(weight, [hit.id for hit in found.hits])

    # One photo in two spaces of images (efficientnet-lite0's, and MiniLM's through the label space):
    photo = Image.fromarray(data.chelsea())
    client.upsert([Item("demo-cat", image=photo, payload={"shop": "demo"})])  # efficientnet-lite0
    client.upsert([Item("demo-cat", image=photo, payload={"shop": "demo"})], model="imagenet-label-space")
    fused = client.search(photo, k=3, all_spaces=True, where={"shop": "demo"})
    print([(hit.id, [(source.model.space, source.rank) for source in hit.sources]) for hit in fused.hits])
