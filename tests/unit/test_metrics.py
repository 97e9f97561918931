import pytest

from retain.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer, summarize

R = [
    [80.0, 10.0, 20.0],
    [60.0, 90.0, 30.0],
    [50.0, 70.0, 95.0],
]
B = [5.0, 15.0, 25.0]


def test_average_accuracy_is_mean_of_last_row():
    assert average_accuracy(R) == pytest.approx((50 + 70 + 95) / 3)


def test_backward_transfer_by_hand():
    # (50-80 + 70-90) / 2
    assert backward_transfer(R) == pytest.approx(-25.0)


def test_forward_transfer_by_hand():
    # (R[0][1]-b1 + R[1][2]-b2) / 2 = (10-15 + 30-25) / 2
    assert forward_transfer(R, B) == pytest.approx(0.0)
    assert forward_transfer(R, [0, 0, 0]) == pytest.approx(20.0)


def test_forgetting_uses_max_over_earlier_rows():
    # task0: max(80-50, 60-50)=30; task1: max(10-70, 90-70)=20 -> 25
    assert forgetting(R) == pytest.approx(25.0)


def test_no_forgetting_when_scores_only_rise():
    up = [[10.0, 0.0], [20.0, 50.0]]
    assert backward_transfer(up) == pytest.approx(10.0)
    assert forgetting(up) == pytest.approx(-10.0)


def test_single_task_and_joint_rows():
    assert summarize([[40.0]], [0.0]) == {"AA": 40.0, "BWT": None, "FWT": None, "FM": None}
    joint = summarize([[40.0, 60.0, 80.0]], [0, 0, 0])
    assert joint["AA"] == pytest.approx(60.0) and joint["BWT"] is None


def test_non_square_matrix_is_refused():
    with pytest.raises(ValueError, match="square"):
        backward_transfer([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="one base score per task"):
        forward_transfer(R, [1.0])
