"""Membership soft state: liveness from routes, registration, losses, names."""

from manager.membership import Membership


def test_names_follow_registration_and_placeholders():
    clock = [0.0]
    m = Membership(1, clock=lambda: clock[0])
    m.route_added([5, 6])
    assert m.names() == {1: "manager", 5: "#5", 6: "#6"}
    m.registered({"id": 5, "name": "a", "parent": 1})
    assert m.names()[5] == "a"
    m.registered({"id": 7, "name": "b", "parent": 5})
    assert m.names()[7] == "b"
    m.lost([6], "dead", 6)
    clock[0] = 1000.0
    m.expire()
    assert 6 not in m.names()


def test_loss_marks_the_dead_and_the_orphaned_and_events_name_them():
    m = Membership(1)
    for i, parent in ((5, 1), (6, 5), (7, 6)):
        m.route_added([i])
        m.registered({"id": i, "name": f"n{i}", "parent": parent, "ctl": f"tcp://h:{i}"})
    m.lost([5, 6, 7], "dead", 5)
    assert [m.members[i].state for i in (5, 6, 7)] == ["dead", "unreachable", "unreachable"]
    assert m.events[-1]["kind"] == "lost" and m.events[-1]["node"] == "n5"
    m.route_added([6, 7])
    m.registered({"id": 6, "name": "n6", "parent": 1, "reason": "rejoined", "orphaned_for": 0.2, "ctl": "tcp://h:6"})
    assert m.members[6].state == "alive" and m.events[-1]["kind"] == "rejoined"
    assert m.depths()[7] == 2
    assert m.open_slots(2)[6][:2] == [1, 1]
